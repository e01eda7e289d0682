require ["body","fileinto"]; if body :contains "saying" { fileinto "b"; }
