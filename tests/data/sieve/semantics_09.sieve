require ["variables","fileinto"]; if header :regex "subject" "(h)(e)" { fileinto "${0}|${1}|${2}|${3}"; }
