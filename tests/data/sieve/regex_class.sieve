require ["fileinto","regex"];
if address :regex "from" "^[[:alpha:]]+@[a-z]+\\.example$" { fileinto "Class"; }
