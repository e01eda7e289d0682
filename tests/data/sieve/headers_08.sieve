require ["fileinto","comparator-i;ascii-numeric"]; if header :is :comparator "i;ascii-numeric" "x-spam-score" "3" { fileinto "N"; }
