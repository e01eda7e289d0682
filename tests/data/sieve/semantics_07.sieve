require ["variables","fileinto"]; set "x" "${unknown}abc"; fileinto "${x}";
