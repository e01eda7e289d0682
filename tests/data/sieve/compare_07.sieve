require "fileinto"; if address :domain :is "from" "Z.EXAMPLE" { fileinto "dom"; }
