require ["fileinto","relational"]; if address :count "eq" "from" "1" { fileinto "One"; } elsif address :count "eq" "from" "2" { fileinto "TwoF"; }
