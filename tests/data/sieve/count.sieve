require ["fileinto","relational","comparator-i;ascii-numeric"];
if header :count "ge" :comparator "i;ascii-numeric" "received" "2" { fileinto "TwoHops"; }
if address :count "eq" :comparator "i;ascii-numeric" ["to","cc"] "3" { fileinto "Three"; }
