require "fileinto"; if header :contains "to" "Other" { fileinto "dn"; }
