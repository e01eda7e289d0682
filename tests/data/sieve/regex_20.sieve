require ["fileinto","regex"]; if header :regex "subject" "[a\\]" { fileinto "bsl"; }
