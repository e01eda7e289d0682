require "fileinto"; if address :is "from" "BOB@Y.EXAMPLE" { fileinto "ok"; }
