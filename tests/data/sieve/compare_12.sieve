require ["fileinto","relational","comparator-i;ascii-numeric"]; if header :count "eq" :comparator "i;ascii-numeric" "x-spam-score" "2" { fileinto "c2"; }
