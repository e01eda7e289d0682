require "fileinto"; if header :is "subject" "GRÜßE AUS BERLIN" { fileinto "umlautcase"; }
