require ["fileinto","regex","variables"]; if header :regex "subject" "([0-9]+|[0-9]+ for)" { fileinto "L/${1}"; }
