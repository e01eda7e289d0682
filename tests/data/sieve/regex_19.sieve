require ["fileinto","regex"]; if header :regex "subject" "[[:upper:]]{4}" { fileinto "cls"; }
