require ["variables","fileinto"]; set :upper :lowerfirst "a" "hello"; fileinto "${a}";
