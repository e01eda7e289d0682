require ["fileinto","variables"]; set "a.b" "x"; fileinto "${a.b}";
