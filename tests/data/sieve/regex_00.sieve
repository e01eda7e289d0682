require ["fileinto","regex"]; if header :regex "subject" "[[:digit:]]{5}" { fileinto "posix"; }
