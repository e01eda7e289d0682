require ["fileinto","variables"];
if header :matches "subject" "*o*" { fileinto "M/${1}-${2}"; }
