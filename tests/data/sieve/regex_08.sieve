require ["fileinto","regex","variables"]; if header :regex "subject" "(x)?Order" { fileinto "O/${1}/"; }
