require ["fileinto","relational"]; if header :value "gt" :comparator "i;octet" "subject" "Grüße" { fileinto "oct"; }
