require ["fileinto","regex"]; if header :regex "subject" "order" { fileinto "ci"; }
