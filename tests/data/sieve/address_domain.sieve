require "fileinto";
if address :domain :is "from" "LIST.EXAMPLE" { fileinto "Dom"; }
