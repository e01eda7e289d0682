require ["fileinto","relational"]; if address :count "eq" "to" "2" { fileinto "Two"; }
