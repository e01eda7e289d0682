require ["variables"]; set :length :upper "a" "x";
