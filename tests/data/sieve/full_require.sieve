require ["fileinto","reject","envelope","encoded-character","subaddress","copy","imap4flags","vacation","vacation-seconds","variables","body","relational","comparator-i;ascii-numeric","mailbox","regex"];
if anyof (header :contains "subject" "hello", size :over 1M) { addflag "\\Seen"; fileinto :copy "All"; }
