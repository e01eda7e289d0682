require ["fileinto","relational"]; if header :value "eq" "subject" "GRÜSSE AUS BERLIN" { fileinto "ueq"; }
