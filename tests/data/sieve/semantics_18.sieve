require "fileinto"; if address :is "to" "me@x.example" { fileinto "a"; } if address :all :contains "from" "Bob" { fileinto "b"; }
