require ["fileinto","regex"]; if header :regex "subject" "[.]b" { fileinto "dot"; }
