require ["fileinto","variables"]; set "A" "up"; fileinto "${a}";
