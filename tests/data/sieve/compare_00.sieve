require ["fileinto","relational"]; if header :count "gt" "received" "1" { fileinto "casemapcount"; }
