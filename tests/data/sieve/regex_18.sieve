require ["fileinto","regex"]; if header :regex "subject" "[^]a-z ]" { fileinto "neg"; }
