require ["body","fileinto"];
if body :raw :contains "<b>pay</b>" { fileinto "RawHtml"; }
