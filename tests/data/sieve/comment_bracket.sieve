require /* inline */ "fileinto"; # and a hash
/* multi
line */ fileinto "C";
