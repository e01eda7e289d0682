require ["imap4flags","fileinto"];
fileinto :flags "\\Answered \\Seen" "Done";
keep :flags "\\Deleted";
