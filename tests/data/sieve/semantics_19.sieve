require ["fileinto","mailbox"]; if mailboxexists "INBOX" { fileinto "y"; }
