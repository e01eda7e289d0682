require ["fileinto","body"]; if body :raw :contains "LF only" { fileinto "Body"; }
