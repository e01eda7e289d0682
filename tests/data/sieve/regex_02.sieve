require ["fileinto","regex"]; if header :regex "subject" "\\[ACME\\]" { fileinto "br"; }
