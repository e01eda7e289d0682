require ["variables","fileinto"]; if header :matches "subject" "*" { fileinto "${0}|${1}|${2}"; }
