require ["body","fileinto"];
if body :text :contains "pay" { fileinto "Pay"; }
