require ["fileinto","regex"]; if header :regex "subject" "\\bfor\\b" { fileinto "wb"; }
