require ["fileinto","regex"]; if header :regex "subject" "[\\]]" { fileinto "bs"; }
