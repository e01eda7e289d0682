require ["fileinto","variables"]; fileinto "${}${ x}$${a}";
