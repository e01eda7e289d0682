require ["imap4flags","fileinto"]; fileinto "A"; addflag "\\Seen"; fileinto "A";
