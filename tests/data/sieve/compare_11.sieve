require ["fileinto","relational","comparator-i;ascii-numeric"]; if header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "7" { fileinto "ge7"; }
