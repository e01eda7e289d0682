require ["fileinto","relational"]; if header :count "lt" "received" "10" { fileinto "lt10str"; }
