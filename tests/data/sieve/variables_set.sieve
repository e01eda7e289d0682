require ["fileinto","variables"];
set "a" "Hello";
set :lower "b" "${a} World";
set :upperfirst "c" "${b}";
set :length "n" "${c}";
fileinto "V/${c}/${n}";
