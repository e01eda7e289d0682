require ["fileinto","regex"]; if header :regex "subject" "a{2,1}" { fileinto "badrep"; }
