require ["fileinto","regex"];
if header :regex "subject" "^HELLO" { fileinto "RxCase"; }
if header :regex :comparator "i;octet" "subject" "^HELLO" { fileinto "RxOctet"; }
