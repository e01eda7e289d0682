require ["body","fileinto"];
if body :content "text/html" :contains "<b>" { fileinto "Html"; }
if body :content "text/plain" :contains "<b>" { fileinto "PlainB"; }
