require ["fileinto","regex"]; if header :regex "subject" "[]x]" { fileinto "first"; }
