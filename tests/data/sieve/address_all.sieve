require "fileinto";
if address :all :is "from" "bob@y.example" { fileinto "Bob"; }
