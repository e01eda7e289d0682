require ["fileinto","envelope"];
if envelope :all :is "from" "" { fileinto "Null"; } elsif envelope :domain :is "from" "y.example" { fileinto "FromY"; }
