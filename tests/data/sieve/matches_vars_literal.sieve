require ["fileinto","variables"];
if header :matches "subject" "RE: *" { fileinto "Re/${1}"; }
