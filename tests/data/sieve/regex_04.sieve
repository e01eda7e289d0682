require ["fileinto","regex"]; if header :regex "subject" "a\\.b$" { fileinto "end"; }
