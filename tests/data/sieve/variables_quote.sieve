require ["fileinto","variables"];
set :quotewildcard "q" "a*b?c";
if string :is "${q}" "a\\*b\\?c" { fileinto "Quoted"; }
